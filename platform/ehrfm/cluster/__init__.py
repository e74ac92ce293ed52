"""Ray clusters for ehrfm: a local multi-node launcher and the token-auth settings its clients need.

The cluster definitions for Kubernetes (KubeRay) and clouds (`ray up`) are YAML files under
`cluster/` at the repository root; docs/OPERATIONS.md explains when to use which.
"""
