//! Kubernetes Events on PinnedPeers (being written).
