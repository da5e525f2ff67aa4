"""The one exception class for a user's mistake.

Our checks raise `UserError` with one line that says what was wrong with the input and what to do;
the predictor passes that line through as the prediction's error. Anything else (a `ValueError`
from diffusers, torch or PIL included) is an internal error: its traceback goes to the logs and
the user gets one line pointing there.
"""


class UserError(Exception):
    """A request input that cannot be served as given; the message is shown to the user as is."""
