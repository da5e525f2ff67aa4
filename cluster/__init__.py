"""Scale out: many Cog servers (one per GPU) behind Ray Serve, each request routed to the replica that
already holds its LoRA.

    routing.py   what a request is routed by: one id per LoRA it names (no Ray here)
    router.py    LoraAffinityRouter: Ray's router, sending each request where its LoRAs are loaded
    replica.py   CogReplica: one unmodified Cog server (coglet) per replica, requests forwarded to it
    ingress.py   CogIngress: the Cog HTTP API, unchanged, in front of the replicas
    app.py       ClusterArgs and build(): the Ray Serve application (`serve run cluster.app:build`)
    __main__.py  `python -m cluster` (`make serve-cluster`): a local Ray instance and the app, foreground
"""
