"""`treg-push DIR ORG/NAME`: upload a treg-score output folder to the Hugging Face Hub."""

from __future__ import annotations

from typing import Optional

import typer

from treg_data.command_line import CONTEXT, GroupedTyperCommand, option, run_cli, typer_app

app = typer_app()


@app.command(cls=GroupedTyperCommand, context_settings=CONTEXT)
def push(
    folder: str = typer.Argument(..., help="A finished treg-score output folder."),
    repo_id: str = typer.Argument(..., help="Hub dataset repository, ORG/NAME (created if missing)."),
    private: bool = option(False, "Options", "Create the repository as private."),
    license: Optional[str] = option(None, "Options", "Licence for the card (default: the source dataset's)."),
) -> None:
    """Write a dataset card into FOLDER and upload the card, manifest and shards."""
    from treg_data.hub import push_to_hub

    url = push_to_hub(folder, repo_id, private=private, license=license)
    print(f"treg-push: uploaded {folder} to {url}")


def main() -> None:
    run_cli(app, "treg-push")


if __name__ == "__main__":
    main()
