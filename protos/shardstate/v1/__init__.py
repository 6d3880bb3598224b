"""Generated protobuf and gRPC code for the shardstate.v1 wire API.

Regenerate with `python protos/generate.py`; never edit the *_pb2* files by hand.
"""
