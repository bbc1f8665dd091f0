"""Import before prometheus_client: it takes a *set but empty* PROMETHEUS_MULTIPROC_DIR for
multiprocess mode and then writes its *.db files into the working directory. Empty means unset."""
import os

if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == "":
    del os.environ["PROMETHEUS_MULTIPROC_DIR"]
