"""Routing the gateway's generations over N scheduler replicas (issue 18).

    discovery    where the replicas are: a static `--scheduler-address a,b,...` list, or a headless
                 Service's DNS name (`--scheduler-dns NAME:PORT`) re-resolved periodically;
    replica      one scheduler replica: its channel, its multiplexed GenerateStream, its load and
                 health from its WatchStats stream;
    policies     which replica a prompt goes to: prefix (cache-aware, bounded load), least-load,
                 round-robin;
    replica_set  the replicas the gateway routes over (what `Backend` holds);
    resume       which generations can continue on another replica by replay, and with what budget.

Kubernetes is the cluster manager (Deployments, headless Service DNS, HPA); this package only picks
a replica per request, moves a request that has not produced a token off a replica that failed, and
resumes a greedy one that had (resume.py).
"""
