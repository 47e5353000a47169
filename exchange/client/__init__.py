"""The consumer's side: the SDK, typed results, and the consumer roles of private joins
and encrypted computations. Installed with ``pip install zonex``; imports neither the
server nor the node."""
