"""`moekit plugins`: every installed plug-in component (name, kind, plug-in, package, version), and the broken."""

from __future__ import annotations

import json
from typing import Literal

import typer
from rich.console import Console
from rich.table import Table

from moekit.plugins.hooks import KINDS


def plugins(
    kind: Literal[(*KINDS, "arch_adapter")] = typer.Option(None, "--kind", help="only this kind"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
) -> None:
    """List the components that installed plug-ins provide, and plug-ins that failed to load (with why)."""
    from moekit.plugins.registry import ALLOW_ENV, registry

    reg = registry()
    info = {p.name: p for p in reg.plugins}
    rows = []
    for k in KINDS:
        for name, component in sorted(reg.components(k).items()):
            rows.append((name, k, component.plugin, component.description))
    for model_type in sorted(reg.families()):
        rows.append((model_type, "arch_adapter", reg.family_plugin(model_type), "model family"))
    rows = [r for r in rows if kind is None or r[1] == kind]
    broken = [p for p in reg.plugins if p.error]
    if as_json:
        listing = [
            {"name": n, "kind": k, "plugin": p, "package": info[p].package, "version": info[p].version, "about": d}
            for n, k, p, d in rows
        ]
        errors = [{"plugin": p.name, "package": p.package, "version": p.version, "error": p.error} for p in broken]
        typer.echo(json.dumps({"components": listing, "broken": errors}, indent=2))
        return
    console = Console()
    table = Table()
    for column in ("name", "kind", "plug-in", "package", "version"):
        table.add_column(column, no_wrap=True)
    table.add_column("description")
    for name, k, plugin, description in rows:
        table.add_row(name, k, plugin, info[plugin].package, info[plugin].version, description)
    console.print(table if rows else "no plug-in components installed")
    for p in broken:
        console.print(f"[red]broken plug-in {p.name}[/red] ({p.package} {p.version}): {p.error}", highlight=False)
    if not reg.plugins:
        console.print(f"no plug-ins loaded ({ALLOW_ENV} may exclude them)")
