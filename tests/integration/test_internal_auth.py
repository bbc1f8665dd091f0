"""Issue 16, finding 2: the internal gRPC hop is no longer open to any local process. With a
service token every RPC but grpc.health.v1 needs it (Generate, GetStats, Abort, the executor's
Reset, reflection); mTLS refuses clients without a certificate from the CA; reflection is off
unless asked for; the gateway authenticates with the token it is given."""
from __future__ import annotations

import datetime
import ipaddress

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.config import GatewayConfig
from services.executor.server import SERVICE_NAME as EXECUTOR_SERVICE
from services.executor.server import ExecutorServicer
from services.gen.pagedserve.v1 import (
    executor_pb2,
    executor_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)
from services.grpc_server import GrpcServer
from services.internal_auth import TOKEN_ENV, InternalSecurity
from tests.integration.fake_executor import FakeExecutor
from tests.integration.fake_scheduler import FakeScheduler
from tests.integration.gateway_stack import SCHEDULER_SERVICE, InProcessStack

pytestmark = pytest.mark.timeout(120)
TOKEN = "s3cret-service-token"


@pytest.fixture(scope="module")
def tok(smol_tokenizer):
    return smol_tokenizer


def _code(fn) -> str:
    try:
        fn()
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


@pytest.fixture
def executor_server():
    """The real executor servicer (fake model) on a sync server that wants the token."""
    def make(security: InternalSecurity, reflection: bool = False) -> GrpcServer:
        srv = GrpcServer("executor", [EXECUTOR_SERVICE], "127.0.0.1", 0, max_workers=4, grace_s=0.1,
                         security=security, reflection=reflection)
        servicer = ExecutorServicer(FakeExecutor())
        executor_pb2_grpc.add_ExecutorServicer_to_server(servicer, srv.server)
        srv.on_shutdown(servicer.close_streams)
        srv.start()
        srv.set_serving(True)
        servers.append(srv)
        return srv

    servers: list[GrpcServer] = []
    yield make
    for srv in servers:
        srv.stop(0).wait(5)


def test_executor_requires_the_token(executor_server):
    srv = executor_server(InternalSecurity(token=TOKEN))
    with grpc.insecure_channel(srv.address) as ch:
        stub = executor_pb2_grpc.ExecutorStub(ch)
        assert _code(lambda: stub.Reset(executor_pb2.ResetRequest(), timeout=5)) == "UNAUTHENTICATED"
        assert _code(lambda: stub.Describe(executor_pb2.DescribeRequest(), timeout=5,
                                           metadata=(("authorization", "Bearer wrong"),))) == "UNAUTHENTICATED"
        step = stub.Step(iter([executor_pb2.StepBatch()]), timeout=5)
        assert _code(lambda: list(step)) == "UNAUTHENTICATED"
        # probes stay open
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # reflection is off by default
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        assert _code(lambda: list(call)) == "UNIMPLEMENTED"
    with InternalSecurity(token=TOKEN).channel(srv.address) as ch:
        stub = executor_pb2_grpc.ExecutorStub(ch)
        assert _code(lambda: stub.Reset(executor_pb2.ResetRequest(), timeout=5)) == "OK"
        assert stub.Describe(executor_pb2.DescribeRequest(), timeout=5).num_kv_blocks > 0


def test_reflection_on_request_needs_the_token(executor_server):
    srv = executor_server(InternalSecurity(token=TOKEN), reflection=True)
    req = [reflection_pb2.ServerReflectionRequest(list_services="")]
    with grpc.insecure_channel(srv.address) as ch:
        call = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter(req), timeout=5)
        assert _code(lambda: list(call)) == "UNAUTHENTICATED"
    with InternalSecurity(token=TOKEN).channel(srv.address) as ch:
        resp = next(reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter(req), timeout=5))
        assert EXECUTOR_SERVICE in {s.name for s in resp.list_services_response.service}


def test_scheduler_and_gateway_with_token(tok, monkeypatch):
    """Every service of an in-process stack wants the token (from the environment, as the launcher
    hands it over): a process without it can neither Generate past the gateway's caps, read request
    ids, nor Abort; the gateway itself, given the token, serves normally."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    st = InProcessStack()
    try:
        fake = FakeScheduler.for_tokenizer(tok, max_model_len=256)
        sched = st.start_scheduler(fake)
        url = st.start_gateway(GatewayConfig(scheduler_address=sched, tokenizer_address=st.start_tokenizer(tok, 256)))
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200, r.text
        with grpc.insecure_channel(sched) as ch:
            stub = scheduler_pb2_grpc.SchedulerStub(ch)
            gen = stub.Generate(scheduler_pb2.GenerateRequest(request_id="x", prompt_token_ids=[1]), timeout=5)
            assert _code(lambda: list(gen)) == "UNAUTHENTICATED"
            assert _code(lambda: stub.GetStats(scheduler_pb2.GetStatsRequest(include_requests=True),
                                               timeout=5)) == "UNAUTHENTICATED"
            assert _code(lambda: stub.Abort(scheduler_pb2.AbortRequest(request_ids=["x"]), timeout=5)) \
                == "UNAUTHENTICATED"
            ok = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SCHEDULER_SERVICE),
                                                       timeout=5)
            assert ok.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        st.close()


# ---------------------------------------------------------------------------- mTLS
def _certs(tmp_path):
    """A CA, and a certificate for 127.0.0.1 / localhost signed by it (server and client use it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def pem_key(k):
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    def cert(subject, key, issuer, issuer_key, ca: bool, san=None):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert(name("pagedserve test CA"), ca_key, name("pagedserve test CA"), ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = cert(name("pagedserve"), key, ca.subject, ca_key, False,
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    paths = {}
    for label, data in (("ca", ca.public_bytes(serialization.Encoding.PEM)),
                        ("cert", leaf.public_bytes(serialization.Encoding.PEM)), ("key", pem_key(key))):
        paths[label] = tmp_path / f"{label}.pem"
        paths[label].write_bytes(data)
    # a second, unrelated CA + leaf (a client the stack does not trust)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = cert(name("rogue"), rogue_key, name("rogue"), rogue_key, False,
                 [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    paths["rogue_cert"] = tmp_path / "rogue.pem"
    paths["rogue_cert"].write_bytes(rogue.public_bytes(serialization.Encoding.PEM))
    paths["rogue_key"] = tmp_path / "rogue.key"
    paths["rogue_key"].write_bytes(pem_key(rogue_key))
    return paths


def test_mtls_between_services(tmp_path, executor_server):
    p = _certs(tmp_path)
    sec = InternalSecurity.from_env({}, tls_cert=str(p["cert"]), tls_key=str(p["key"]), tls_ca=str(p["ca"]))
    srv = executor_server(sec)
    with sec.channel(srv.address) as ch:  # a client with a certificate from the CA
        assert executor_pb2_grpc.ExecutorStub(ch).Describe(executor_pb2.DescribeRequest(), timeout=5).num_kv_blocks
    with grpc.insecure_channel(srv.address) as ch:  # plaintext
        assert _code(lambda: executor_pb2_grpc.ExecutorStub(ch).Describe(executor_pb2.DescribeRequest(),
                                                                        timeout=3)) == "UNAVAILABLE"
    no_cert = grpc.ssl_channel_credentials(root_certificates=p["ca"].read_bytes())
    with grpc.secure_channel(srv.address, no_cert) as ch:  # TLS but no client certificate
        assert _code(lambda: executor_pb2_grpc.ExecutorStub(ch).Describe(executor_pb2.DescribeRequest(),
                                                                        timeout=3)) == "UNAVAILABLE"
    rogue = grpc.ssl_channel_credentials(root_certificates=p["ca"].read_bytes(),
                                         private_key=p["rogue_key"].read_bytes(),
                                         certificate_chain=p["rogue_cert"].read_bytes())
    with grpc.secure_channel(srv.address, rogue) as ch:  # a certificate from another CA
        assert _code(lambda: executor_pb2_grpc.ExecutorStub(ch).Describe(executor_pb2.DescribeRequest(),
                                                                        timeout=3)) == "UNAVAILABLE"


def test_incomplete_tls_settings_are_an_error():
    with pytest.raises(ValueError, match="all three"):
        InternalSecurity.from_env({}, tls_cert="/x.pem")


def test_launcher_stack_over_mtls(tmp_path):
    """`pagedserve serve --tls-cert/--tls-key/--tls-ca` (fake executor): every internal hop is mTLS
    plus the token, the gateway answers through it, a plaintext caller is refused."""
    from tests.integration.test_launcher import SECURITY, Launcher

    p = _certs(tmp_path)
    launcher = Launcher(tmp_path / "serve.log", "--executor-factory", "tests.integration.fake_executor:FakeExecutor",
                        "--max-model-len", "256", "--num-gpu-blocks-override", "32", "--shutdown-grace", "1",
                        "--tls-cert", str(p["cert"]), "--tls-key", str(p["key"]), "--tls-ca", str(p["ca"]))
    try:
        services = launcher.wait_ready()
        r = httpx.post(f"{services['gateway'][0]}/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 3},
                       timeout=30)
        assert r.status_code == 200, r.text
        sched = services["scheduler"][0]
        with grpc.insecure_channel(sched) as ch:
            assert _code(lambda: scheduler_pb2_grpc.SchedulerStub(ch).GetStats(scheduler_pb2.GetStatsRequest(),
                                                                              timeout=3)) == "UNAVAILABLE"
        tls = InternalSecurity.from_env({}, tls_cert=str(p["cert"]), tls_key=str(p["key"]), tls_ca=str(p["ca"]))
        with tls.channel(sched) as ch:  # the certificate alone is not enough: the token too
            assert _code(lambda: scheduler_pb2_grpc.SchedulerStub(ch).GetStats(scheduler_pb2.GetStatsRequest(),
                                                                              timeout=5)) == "UNAUTHENTICATED"
        both = InternalSecurity(token=SECURITY.token, tls_cert=tls.tls_cert, tls_key=tls.tls_key, tls_ca=tls.tls_ca)
        with both.channel(sched) as ch:
            assert scheduler_pb2_grpc.SchedulerStub(ch).GetStats(scheduler_pb2.GetStatsRequest(),
                                                                 timeout=5).executor_healthy
    finally:
        launcher.kill()
