"""Options listed in named groups in ``--help`` (click has one flat list).

An option made with ``cls=GroupedOption, group="training"`` appears under that heading when its
command is a :class:`GroupedCommand`; the headings follow the command's ``groups`` order and
options without a group come last, under "other".
"""

from __future__ import annotations

from typing import Any

import click


class GroupedOption(click.Option):
    """A click option with a ``group`` heading for ``--help``."""

    def __init__(self, *args: Any, group: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group


class GroupedCommand(click.Command):
    """A command whose ``--help`` lists the options group by group."""

    def __init__(self, *args: Any, groups: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.groups = groups

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {g: [] for g in self.groups}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record is not None:
                sections.setdefault(getattr(param, "group", None) or "other", []).append(record)
        for name, records in sections.items():
            if records:
                with formatter.section(name[0].upper() + name[1:]):
                    formatter.write_dl(records)
