"""A provider's zone node: its data store, its keys, its local veto rules, and the provider's
side of every computation (check the query again, read rows, draw DP noise, sign the result).

The node runs on the provider's machine (``zonex node serve``) and dials out to the exchange;
the embedded default runs the same release code in the exchange's process for zones that have
no node (:mod:`exchange.node.engine`). Nothing here imports the exchange server.
"""
