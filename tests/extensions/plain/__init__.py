"""A plain module: no ExtensionBase subclass; the application's own class drives it."""

ANSWER = 42


def double(x):
    return 2 * x
