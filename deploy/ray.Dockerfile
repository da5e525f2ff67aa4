# The Cog image with Ray Serve added, for deploy/rayservice.yaml (cog.yaml itself does not carry Ray):
#
#   cog build -t flux-lora
#   docker build -f deploy/ray.Dockerfile --build-arg COG_IMAGE=flux-lora -t <registry>/flux-lora-ray .
#
# The project (cluster/ included) is in /src, as Cog put it; KubeRay's probes need wget.
ARG COG_IMAGE=flux-lora
FROM ${COG_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends wget && rm -rf /var/lib/apt/lists/* \
    && python -m pip install --no-cache-dir "ray[serve]==2.60.0"
WORKDIR /src
