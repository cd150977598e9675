"""The network as a graph: finding layers by name, torch.fx tracing, splitting a network at a
layer, and fused inference forms of the same function."""
