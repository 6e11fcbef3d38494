"""The node operation, shared by the pack and the in-process baseline."""


def node(image, scale):
    """One fresh tensor of the image's shape: a scale, a shift and a clamp."""
    return (image * scale).add_(0.001).clamp_(0.0, 1.0)
