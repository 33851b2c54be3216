"""Decentralized communication: gossip topologies, mixing weights and neighbour exchange."""
