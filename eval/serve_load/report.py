"""The load run's report (eval/serve_load/): the (check, result) rows that docs/benchmarks.md shows, and the rich
table with each failure and each refusal's reason as one line."""

from __future__ import annotations


def report_rows(report: dict) -> list[tuple[str, str]]:
    """(check, result) rows of the table: what docs/benchmarks.md shows."""
    rows = []
    load = report["phases"].get("load")
    if load:
        rows += [("requests (bad ones mixed in)", f"{load['sent']} ({load['bad']} bad) at concurrency "
                                                  f"{report['config']['concurrency']}, {load['wall_s']} s, "
                                                  f"{load['requests_per_s']} req/s"),
                 ("good answered", f"{load['answered']} / {load['good']}"),
                 ("equal to gist generate (sample)", f"{load['equal']} / {load['compared']}"),
                 ("same answer per (instruction, input)", f"{load['pairs'] - load['inconsistent_pairs']} / "
                                                          f"{load['pairs']} pairs"),
                 ("bad refused with a one-line 4xx reason", f"{load['refused_with_reason']} / {load['bad']}")]
    replace = report["phases"].get("replace")
    if replace:
        rows.append(("cache file replaced while serving", f"{replace['sent']} requests, {replace['swaps']} swaps: "
                                                          f"{replace['own_answers']} own answer, {replace['refused']} "
                                                          f"refused 4xx, {replace['refused_by_engine_500']} failed "
                                                          f"by the engine (500), {replace['mixed']} mixed"))
    kill = report["phases"].get("kill")
    if kill:
        store = kill["store"]
        rows += [("SIGKILL mid-load", f"after {kill['killed_after_answers']} of {kill['sent_before_kill']} "
                                      f"answers, {kill['lost_to_kill']} in flight lost"),
                 ("store after SIGKILL (gist cache verify)", f"{store['verified_ok']} / "
                                                              f"{store['entries'] - store['damaged_on_purpose']} "
                                                              f"entries ok (+{store['damaged_on_purpose']} damaged "
                                                              f"on purpose, unchanged)"),
                 ("answered after restart", f"{kill['after_restart']['answered']} / {kill['after_restart']['sent']}"
                                            f" ({kill['after_restart']['equal']} / {kill['after_restart']['compared']}"
                                            f" equal), restart {kill['restart_s']} s")]
    server = report["server"]
    if "crashed" in server:
        rows += [("crashed (exits, tracebacks, 5xx but the replaced file's)",
                  f"{server['crashed']} ({server['tracebacks_in_log']} tracebacks)"),
                 ("restarts survived", str(server["restarts_survived"]))]
    memory = report["memory"]
    if memory:
        rows.append(("server RSS before / after load", f"{memory['before_mib']} / {memory['after_mib']} MiB "
                                                       f"({memory['change']:+.1%})"))
    rows.append(("verdict", "ok" if report["ok"] else f"{len(report['failures'])} failures"))
    return rows


def print_report(report: dict, console=None) -> None:
    """The table, then each failure and each refusal's reason as one line (rich never wraps them: soft_wrap)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(soft_wrap=True)
    table = Table(title="gist serve under load and faults", header_style="bold")
    table.add_column("check", overflow="fold")
    table.add_column("result", overflow="fold")
    for check, result in report_rows(report):
        table.add_row(escape(check), escape(result))
    console.print(table)
    for kind, reason in report["phases"].get("load", {}).get("reasons", {}).items():
        console.print(f"refused {escape(kind)}: {escape(reason)}", highlight=False, soft_wrap=True)
    for line in report["failures"]:
        console.print(f"[bold red]failed:[/] {escape(line)}", highlight=False, soft_wrap=True)
