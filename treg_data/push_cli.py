"""`treg-push DIR ORG/NAME`: upload a treg-score output folder to the Hugging Face Hub."""

from __future__ import annotations

import click

from treg_core.command_line import CONTEXT, GroupedCommand, HelpedArgument, grouped, run_cli


@click.command(cls=GroupedCommand, context_settings=CONTEXT, params=[
    HelpedArgument(["folder"], help="A finished treg-score output folder."),
    HelpedArgument(["repo_id"], help="Hub dataset repository, ORG/NAME (created if missing)."),
    grouped(click.Option(["--private/--no-private"], default=False, help="Create the repository as private."),
            "Options"),
    grouped(click.Option(["--license"], help="Licence for the card (default: the source dataset's)."), "Options"),
])
def command(folder: str, repo_id: str, private: bool, license: str | None) -> None:
    """Write a dataset card into FOLDER and upload the card, manifest and shards."""
    from treg_data.hub import push_to_hub

    url = push_to_hub(folder, repo_id, private=private, license=license)
    print(f"treg-push: uploaded {folder} to {url}")


def main() -> None:
    run_cli(command, "treg-push")


if __name__ == "__main__":
    main()
