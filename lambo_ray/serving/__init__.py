"""Ray Serve application of the LAMBO policy: the HTTP API of decisions, decoders and health.

``app`` (deployments and ``build_app``), ``api`` (request parsing and response bodies), ``limits`` (what a
request may cost, checked while parsing), ``service`` (what a replica does with the policy: decoders,
batching, registration), ``engine`` (the policy with a shared encoder and decoders by id, no Ray),
``decoders`` (catalog, LRU cache, the decoders directory), ``auth`` (admin token), ``proxy`` (JSON errors
from Serve's proxy), ``config``. Nothing is imported here: importing the package must stay cheap.
"""
