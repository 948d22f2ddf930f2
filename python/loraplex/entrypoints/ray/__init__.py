"""loraplex across replicas (Ray Serve): the adapter-affinity routing policy, and the
deployment that uses it."""
