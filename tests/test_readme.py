"""The README's and the reference docs' examples are part of the product: their config and scenario examples
must load and run, and what they state must be what the code does."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

from flowshard.config import BandConfig, BudgetConfig, Config, ProxyConfig, ServiceConfig, dump_config, load_config
from flowshard.scenario import load_scenario
from flowshard.simulate import simulate

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SERVICE = (ROOT / "docs" / "service.md").read_text()  # the service's reference, moved out of the README
TOOLS = (ROOT / "docs" / "tools.md").read_text()
PROXY = (ROOT / "docs" / "proxy.md").read_text()


def _toml_block_after(heading: str, text: str = README) -> str:
    section = text.split(heading, 1)[1]
    match = re.search(r"```toml\n(.*?)```", section, re.S)
    assert match, f"no TOML example after {heading!r}"
    return match.group(1)


def test_configuration_example_is_valid_and_means_what_it_says():
    shipped = (Path(__file__).resolve().parent.parent / "examples" / "config.toml").read_text()
    assert shipped.split("\n", 2)[2] == _toml_block_after("## Configuration")  # the copy the README names
    config = load_config(_toml_block_after("## Configuration"))
    assert [b.name for b in config.bands] == ["interactive", "batch"]
    assert config.bands[1].ceiling == 0.8 and config.bands[0].displacement
    assert config.weights == {"tenant-a": 2.0, "tenant-b": 1.0}
    assert config.service.lease == 300.0


def test_scenario_example_loads_and_simulates():
    scenario = load_scenario(_toml_block_after("### Scenario format", TOOLS))
    report = simulate(scenario)
    assert report.totals.counts.submitted > 0 and report.totals.counts.dispatched > 0
    assert report.totals.priority_inversions == 0


def test_setup_commands_are_the_ones_ci_runs():
    assert "scripts/test" in README and "scripts/flowshard serve" in README
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "scripts/test" in ci


_TABLES: dict[str, type[msgspec.Struct]] = {"": Config, "budget": BudgetConfig, "service": ServiceConfig,
                                            "bands": BandConfig, "proxy": ProxyConfig}
# stated defaults that are words, not values: what the code has for them
_WORDS = {("", "default_priority"): ("the lowest band", None), ("bands", "name"): ('"p<priority>"', "")}


def _code_default(struct: type[msgspec.Struct], key: str) -> Any:
    field = next(f for f in msgspec.inspect.type_info(struct).fields if f.name == key)  # type: ignore[attr-defined]
    return field.default_factory() if field.default is msgspec.NODEFAULT else field.default


def _stated_defaults() -> dict[tuple[str, str], str]:
    """(table, key) -> the text after `default:` on each key's line of the README's configuration block."""
    stated: dict[tuple[str, str], str] = {}
    table = ""
    for line in _toml_block_after("## Configuration").splitlines():
        if header := re.match(r"\[+(\w+)\]+", line):
            table = header[1]
            continue
        key = re.match(r"(\w+) = ", line)
        if key and "default: " in line and (table, key[1]) not in stated:
            stated[(table, key[1])] = line.split("default: ", 1)[1].split(" (")[0].strip()
    return stated


def test_configuration_block_states_every_default_as_the_code_has_it():
    stated = _stated_defaults()
    checkable = {(t, name) for t, struct in _TABLES.items() for name in struct.__struct_fields__
                 if not (t == "" and name in _TABLES) and name not in ("bands", "weights") and name != "priority"}
    assert checkable - stated.keys() == set(), "keys without a stated default in the README"
    assert stated.keys() - checkable == set(), "defaults stated for keys the code does not have"
    for (table, key), text in stated.items():
        code = _code_default(_TABLES[table], key)
        if (table, key) in _WORDS:
            assert (text, code) == _WORDS[(table, key)]
            continue
        value = tomllib.loads(f"v = {text}")["v"]
        assert (None if value == "unlimited" else value) == code, (table, key, text, code)


def test_config_check_of_an_empty_file_prints_the_readme_defaults():
    printed = tomllib.loads(dump_config(load_config("")))
    for (table, key), text in _stated_defaults().items():
        if (table, key) in _WORDS:
            continue
        section = printed if table == "" else printed[table][0] if table == "bands" else printed[table]
        assert section[key] == tomllib.loads(f"v = {text}")["v"], (table, key)


def test_readme_says_how_to_write_unlimited_and_that_the_budget_is_a_placeholder():
    assert 'max_queued_bytes = "unlimited"' in README
    assert load_config('max_queued_bytes = "unlimited"\n[budget]\nmax_inflight_requests = "unlimited"\n').budget \
        == BudgetConfig(max_inflight_requests=None)
    assert "set `max_inflight_requests` to what your" in README.replace("\n", " ")


def test_shard_advice_is_near_the_top_and_matches_the_cli_default():
    from flowshard.cli import build_parser

    top = README.split("## Set up", 1)[0]
    assert "**default 1**" in top and "**How many shards.** Run one." in top
    assert "uses every core" not in README  # what the measurements do not show
    assert build_parser().parse_args(["serve"]).shards == 1


def test_the_shard_figures_the_readme_cites_are_in_a_shipped_document_and_the_package_agrees():
    """The README's 16-core figures were once attributed to design notes that no shipped document holds;
    the package description said "on every core" against the advice to run one shard."""
    root = Path(__file__).resolve().parent.parent
    shards = " ".join(README.split("## How many shards, measured", 1)[1].split("\n## ", 1)[0].split())
    benchmarks = " ".join((root / "docs" / "benchmarks.md").read_text().split())
    assert "design notes" not in shards
    assert '`docs/benchmarks.md`, "Measured on 16 cores"' in shards and "### Measured on 16 cores" in benchmarks
    assert ("measured by the reviewers on a 16-core machine at `6927e17`: 1/2/4/8 shards 28,823 / 31,564 / "
            "25,863 / 25,141 dispatches/s, `flowshard bench --procs 6` on through-shards-peak") in benchmarks.lower()
    description = tomllib.loads((root / "pyproject.toml").read_text())["project"]["description"]
    assert "every core" not in description and "one shard" in description


def test_readme_says_what_readyz_does_while_draining():
    api = SERVICE.split("## HTTP/JSON API", 1)[1].split("## Binary protocol", 1)[0]
    assert "**While draining**" in api and "a new connection — a readiness\nprobe's included — is refused" in api
    # the behaviour itself: tests/test_service.py::test_graceful_drain_sigterm (refused; 503 on an open connection)


def test_config_check_examples_are_what_it_prints(tmp_path, capsys):
    from flowshard import cli

    block = README.split("## Configuration", 1)[1].split("```\n", 2)[1]
    files = {"bad.toml": "[[bands]]\npriority = 0\nceiling = 1.5\n", "typo.toml": "[budget]\nmax_inflight = 3\n"}
    examples = re.findall(r"^\$ (flowshard config check \S+)\n(.*)$", block, re.M)
    assert len(examples) == 2
    for command, printed in examples:
        name = command.rsplit(" ", 1)[1]
        (tmp_path / name).write_text(files[name])
        assert cli.main(["config", "check", str(tmp_path / name)]) == 2
        assert capsys.readouterr().err.strip() == printed.replace(f"flowshard: {name}", f"flowshard: {tmp_path / name}")


def test_proxy_example_is_valid_and_means_what_it_says():
    config = load_config(_toml_block_after("## Using it", PROXY))
    assert config.proxy.backends == ["http://10.0.0.5:8000", "http://10.0.0.6:8000"]
    assert config.proxy.objectives == {"chat": 10, "summarize-nightly": 0}
    assert config.proxy.models["meta-llama/Llama-3.1-8B-Instruct"] == 10
    assert [b.name for b in config.bands] == ["interactive", "batch"] and config.bands[1].ceiling == 0.8


def test_readme_names_every_scenario_that_simulates():
    from flowshard.simulate import shipped_scenarios

    listed = TOOLS.split("Shipped scenarios:", 1)[1].split("Each simulates", 1)[0]
    listed = " ".join(listed.lower().split())
    missing = [name for name, _, quick in shipped_scenarios() if quick and name.replace("-", " ") not in listed]
    assert not missing, f"docs/tools.md's shipped-scenario list lacks {missing}"


def test_every_limit_the_readme_names_is_a_configuration_key():
    """A `max_…` name in backticks, in the README or a reference doc, reads as a key a user can set; `config
    check` must accept it."""
    keys = {name for struct in _TABLES.values() for name in struct.__struct_fields__}
    # not keys on purpose: vLLM's, in the budget advice; the typo in the `config check` example; the
    # OpenAI request fields the proxy reads for its cost estimate and the openai client's max_retries
    not_keys = {"max_num_seqs", "max_inflight", "max_tokens", "max_completion_tokens", "max_retries"}
    for name, text in (("README", README), ("docs/service.md", SERVICE), ("docs/tools.md", TOOLS),
                       ("docs/proxy.md", PROXY), ("docs/policies.md", (ROOT / "docs" / "policies.md").read_text())):
        named = set(re.findall(r"`(max_[a-z_]+)`", text)) - not_keys
        assert named - keys == set(), f"{name} names limits that are not configuration keys"


def test_the_wire_format_doc_names_each_message_its_tag_and_fields_in_order():
    """docs/wire.md is what a client in another language is written from: each message's tag and its
    fields in wire order must be the codec's, and every outcome's number."""
    from flowshard import codec
    from flowshard.types import Outcome

    wire = (Path(__file__).resolve().parent.parent / "docs" / "wire.md").read_text()
    rows = {m[2]: (int(m[1]), m[3]) for m in re.finditer(r"^\| (\d+) \| `(\w+)` \| (.*) \|$", wire, re.M)}
    messages = [codec.Admit, codec.Release, codec.Result, codec.Audited, codec.Error, codec.Released]
    assert set(rows) == {m.__name__ for m in messages}
    for message in messages:
        tag, text = rows[message.__name__]
        assert tag == message.__struct_config__.tag, message
        named = re.findall(r"`(\w+)`", text)
        fields = list(message.__struct_fields__)
        if message is codec.Audited:  # "the Result fields, then ..."
            fields = fields[len(codec.Result.__struct_fields__):]
        assert [n for n in named if n in fields] == fields, (message.__name__, named)
    for outcome in Outcome:
        assert f"{outcome.value} {outcome.status}" + (f": {outcome.reason}" if outcome.reason else "") in wire


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives a document's headings (lower case, punctuation dropped, spaces to
    hyphens), outside code blocks."""
    anchors, fence = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (heading := re.match(r"#+ (.*)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading[1].strip().lower()).replace(" ", "-"))
    return anchors


def test_every_link_between_the_readme_and_the_docs_leads_somewhere():
    """The reference moved from the README into docs/ (review 167: too long to use as one); a link to a
    file or heading that is not there is a newcomer's dead end."""
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    dead = []
    for doc in documents:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):  # (http:, mailto:)
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists():
                dead.append(f"{doc.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
                dead.append(f"{doc.name}: {target} (no such heading)")
    assert not dead, dead
