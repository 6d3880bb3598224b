"""The router: cluster map, forwarding, scatter-gather, admin coordination."""
