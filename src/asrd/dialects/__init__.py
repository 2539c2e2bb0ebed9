"""Wire dialects: sans-IO codecs between one vendor's messages and :mod:`asrd.events`.

A codec does no I/O and imports no trio, so every protocol rule can be tested synchronously
and the session code stays the same whichever dialect a client speaks.
"""
