"""The RFC 4475 torture corpus through ``callguard serve`` over UDP, with a recording trunk.

The corpus runs once per module (``torture_run.py``) inside a private network namespace with
only loopback, so nothing the proxy might send towards the messages' foreign hosts can leave
the machine. Each file is then checked against ``manifest.tsv``'s criterion:

* INVALID messages: nothing forwarded to the trunk (except where the manifest allows a
  liberal proxy to forward a *normalised* message), and the answer, if any, is one the
  manifest names;
* VALID INVITE-like requests are handled as calls: forwarded, or answered by a screening
  rule (these callers are not numbers, so ``anonymous`` 433 is the usual answer), never 400;
* responses are never answered and never forwarded;
* the proxy answers OPTIONS after every message and exits 0 on SIGTERM at the end.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from .helpers import ROOT, method_of, status_of
from .torture_run import isolation_available, run_isolated

pytestmark = pytest.mark.e2e

CORPUS = ROOT / "tests" / "data" / "rfc4475"
MANIFEST = [ln.split("\t") for ln in (CORPUS / "manifest.tsv").read_text().splitlines()[1:] if ln.strip()]
POLICY = {403, 433, 603, 608}  # screening answers: a request handled as a call

# file -> (answers allowed, may it reach the trunk, is it handled as a call when it does not)
# "call": an INVITE that must be handled as a call (forwarded, or answered by a screening rule)
CRITERIA: dict[str, dict[str, Any]] = {
    # 3.1.1 valid
    # wsinv carries a To tag, so a proxy routes it as a mid-dialog request along its Route header;
    # 404 when that host cannot be resolved (the namespace has no DNS). Whether a lookup was even
    # attempted is test_nothing_left_loopback's business.
    "wsinv.dat": {"call": True, "codes": {404}},
    "intmeth.dat": {"codes": {405, 501}, "forward": True},
    "esc01.dat": {"call": True},
    "escnull.dat": {"not400": True, "forward": True},
    "esc02.dat": {"codes": {501}, "forward": True},          # unknown method; not the REGISTER 405
    "lwsdisp.dat": {"not400": True, "forward": True},
    "longreq.dat": {"call": True},
    "dblreq.dat": {"not400": True, "forward": True, "one": True, "no_invite": True},
    "semiuri.dat": {"not400": True, "forward": True},
    "transports.dat": {"not400": True, "forward": True},
    "mpart01.dat": {"not400": True, "forward": True, "body": True},
    "unreason.dat": {"response": True},
    "noreason.dat": {"response": True},
    # 3.1.2 invalid
    "badinv01.dat": {"codes": {400}},
    "clerr.dat": {"codes": {400}},
    "ncl.dat": {"codes": {400}},
    "scalar02.dat": {"codes": {400}, "must_answer": True},
    "scalarlg.dat": {"response": True},
    "quotbal.dat": {"codes": {400}},
    "ltgtruri.dat": {"codes": {400}},
    "lwsruri.dat": {"codes": {400}, "must_answer": True},
    "lwsstart.dat": {"codes": {400} | POLICY, "normalised": True},
    "trws.dat": {"codes": {400}, "normalised": True},
    "escruri.dat": {"codes": {400} | POLICY, "normalised": True},
    "baddate.dat": {"codes": {400}, "call": True},
    "regbadct.dat": {"codes": {400, 405}},                    # 405: callguard is no registrar
    "badaspec.dat": {"codes": {400}, "forward": True},       # lenient handling allowed
    "baddn.dat": {"codes": {400}},
    "badvers.dat": {"codes": {505}, "must_answer": True},
    "mismatch01.dat": {"codes": {400}, "must_answer": True},
    "mismatch02.dat": {"codes": {501, 400}, "must_answer": True},
    "bigcode.dat": {"response": True},
    # 3.2 / 3.3 semantics
    "badbranch.dat": {"codes": {400}, "forward": True},
    "insuf.dat": {"codes": {400}},
    "unkscm.dat": {"codes": {416}, "must_answer": True},
    "novelsc.dat": {"codes": {416, 404}, "must_answer": True},
    "unksm2.dat": {"not400": True, "forward": True},
    "bext01.dat": {"codes": {420}, "must_answer": True, "unsupported": ("noProxiesSupportThis",
                                                                          "norDoAnyProxiesSupportThis")},
    "invut.dat": {"call": True, "not415": True},
    "regaut01.dat": {"not400": True, "forward": True},
    "multi01.dat": {"codes": {400}, "must_answer": True},
    "mcl01.dat": {"codes": {400}},
    "bcast.dat": {"response": True},
    "zeromf.dat": {"codes": {483, 200}, "must_answer": True},
    "cparam01.dat": {"not400": True, "forward": True},
    "cparam02.dat": {"not400": True, "forward": True},
    "regescrt.dat": {"not400": True, "forward": True},
    "sdp01.dat": {"call": True},
    "inv2543.dat": {"call": True, "codes": {400}},
}


@pytest.fixture(scope="module")
def torture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not isolation_available():
        pytest.skip("needs a private network namespace (root, unshare, ip) so that no test traffic can "
                    "leave loopback")
    work = tmp_path_factory.mktemp("rfc4475")
    out = work / "result.json"
    proc = run_isolated(CORPUS, work / "run", out)
    assert proc.returncode == 0 and out.exists(), f"torture driver failed:\n{proc.stdout}\n{proc.stderr}"
    data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return data


def test_manifest_covers_the_corpus() -> None:
    assert {row[0] for row in MANIFEST} == {p.name for p in CORPUS.glob("*.dat")} == set(CRITERIA)


def _finals(responses: list[str]) -> list[int]:
    return [c for c in (status_of(r) for r in responses) if c is not None and c >= 200]


@pytest.mark.parametrize("name", [row[0] for row in MANIFEST])
def test_torture_message(torture: dict[str, Any], name: str) -> None:
    info = torture["files"][name]
    crit = CRITERIA[name]
    responses: list[str] = info["responses"] + info.get("late_responses", [])
    finals = _finals(responses)
    forwarded: list[str] = info["forwarded"]
    requests_fwd = [m for m in forwarded if method_of(m)]
    what = f"{name}: answers {[r.split(chr(13))[0] for r in responses]}, forwarded " \
           f"{[m.split(chr(13))[0] for m in forwarded]}"

    assert info["alive_after"], f"{name}: the proxy stopped answering OPTIONS"
    if crit.get("response"):
        assert not responses and not forwarded, what
        return
    assert 400 not in finals or 400 in crit.get("codes", set()), what
    assert not any(c >= 500 and c not in crit.get("codes", set()) for c in finals), what
    assert len(finals) <= 1, f"{name}: more than one final answer: {what}"
    if crit.get("must_answer"):
        assert finals, f"{name}: expected one of {sorted(crit['codes'])}, got no answer"
    if crit.get("call"):
        # forwarded to the trunk as an INVITE, or answered by a screening rule (or an allowed code)
        invites = [m for m in requests_fwd if method_of(m) == "INVITE"]
        allowed = POLICY | crit.get("codes", set())
        assert invites or (finals and finals[0] in allowed), f"{name}: not handled as a call: {what}"
        if crit.get("not415"):
            assert 415 not in finals, what
        if name == "wsinv.dat" and invites:
            assert "NewFangledHeader" in invites[0], "unknown header not preserved"
        return
    if requests_fwd:
        if crit.get("normalised"):
            line = requests_fwd[0].split("\r\n", 1)[0]
            assert re.fullmatch(r"\S+ \S+ SIP/2\.0", line), f"{name}: forwarded without normalising: {line!r}"
            assert "?Route=" not in line and "?route=" not in line.lower(), line
        else:
            assert crit.get("forward"), f"{name}: an invalid message reached the trunk: {what}"
        if crit.get("no_invite"):
            assert all(method_of(m) != "INVITE" for m in requests_fwd), f"{name}: trailing octets forwarded"
        if crit.get("body"):
            raw = (CORPUS / name).read_bytes()
            body = raw.split(b"\r\n\r\n", 1)[1]
            sent = requests_fwd[0].encode("utf-8", "surrogateescape")
            assert sent.endswith(body), f"{name}: the body was changed on the way to the trunk"
    if "codes" in crit and finals and not crit.get("not400"):
        assert finals[0] in crit["codes"] or (requests_fwd and crit.get("forward")), \
            f"{name}: expected {sorted(crit['codes'])} (or nothing), got {what}"
    if crit.get("unsupported"):
        unsupported = " ".join(ln for r in responses for ln in r.split("\r\n") if ln.lower().startswith("unsupported"))
        for tag in crit["unsupported"]:
            assert tag in unsupported, f"{name}: Unsupported must list {tag}: {responses}"
    if crit.get("one"):
        assert len([r for r in responses if (status_of(r) or 0) >= 200]) <= 1, what


def test_nothing_left_loopback(torture: dict[str, Any]) -> None:
    """Every address the proxy sent to (strace) is on loopback: no DNS, no foreign Via/Route hosts."""
    if not torture["strace"]:
        pytest.skip("strace not installed: destinations not observable (the namespace still contained them)")
    # The trace must have seen the proxy's answers (all to loopback), or it proves nothing.
    assert any(d.startswith("127.") for d in torture["destinations"]), "strace saw no sends at all"
    outside = [d for d in torture["destinations"] if not (d.startswith("127.") or d.startswith("[::1]"))]
    unresolved = [name for name, info in torture["files"].items()
                  if any("cannot resolve" in r.split("\r\n", 1)[0]
                         for r in info["responses"] + info.get("late_responses", []))]
    hint = f" (port 53 is a DNS lookup; answered 'cannot resolve': {unresolved})" if unresolved else ""
    assert not outside, f"the proxy tried to send outside loopback: {outside}{hint}"


def test_proxy_alive_and_clean_exit_after_corpus(torture: dict[str, Any]) -> None:
    assert torture["alive_at_end"]
    assert torture["marker_final"] == 486, "the marker call did not get the trunk's answer relayed"
    assert torture["exit_code"] == 0, "\n".join(torture["log_tail"])
    assert not torture["faults"], torture["faults"]

