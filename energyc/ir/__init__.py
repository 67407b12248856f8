"""The intermediate representation: a graph of ops on tensors with named axes."""
