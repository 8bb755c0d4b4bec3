"""Generated example data for the README's examples, the demo, tests and benchmarks: image trees
(:func:`make_image_tree`), navigation episodes with a ``.jsonl`` of histories
(:func:`make_episodes`), captioned images with control images (:func:`make_captioned`), and tiny
random diffusers pipelines (:mod:`featstore.examples.pipelines`).

``python -m featstore.examples --help`` makes them from the command line.
"""

from featstore.examples.datasets import make_captioned, make_episodes
from featstore.examples.images import make_image_tree

__all__ = ["make_captioned", "make_episodes", "make_image_tree"]
