"""Fault injection for the HTTP tests, loaded into the Cog worker by tests/offline/sitecustomize.py when
FLUX_TEST_FAULTS=1 is set in the server's environment. Then an output saved with `quality=1` (the
request's `output_quality: 1`, webp or jpg) raises a RuntimeError, standing in for an unexpected
internal failure (a bug, a CUDA error) in the middle of a prediction.
"""

from PIL import Image

_save = Image.Image.save


def _faulty_save(self, fp, format=None, **params):  # noqa: A002 (PIL's own signature)
    if params.get("quality") == 1:
        raise RuntimeError("injected fault: the encoder blew up")
    return _save(self, fp, format, **params)


Image.Image.save = _faulty_save
