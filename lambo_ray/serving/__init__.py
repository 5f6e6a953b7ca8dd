"""Ray Serve application of the LAMBO policy (SPEC section 1, interface contract: HTTP; section 3, Serve).

``app`` (deployments and ``build_app``), ``api`` (request parsing and response bodies), ``engine`` (the
policy with a shared encoder and decoders by id, no Ray), ``decoders`` (catalog and LRU cache), ``config``.
Nothing is imported here: the ingress and catalog processes must not pay for torch.
"""
