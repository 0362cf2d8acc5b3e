"""`treg-push DIR ORG/NAME`: upload a treg-score output folder to the Hugging Face Hub."""

from __future__ import annotations

from typing import Optional

import typer

from treg_data.errors import run_cli

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def push(
    folder: str = typer.Argument(..., help="A finished treg-score output folder."),
    repo_id: str = typer.Argument(..., help="Hub dataset repository, ORG/NAME (created if missing)."),
    private: bool = typer.Option(False, help="Create the repository as private."),
    license: Optional[str] = typer.Option(None, help="Licence for the card (default: the source dataset's)."),
) -> None:
    """Write a dataset card into FOLDER and upload the card, manifest and shards."""
    from treg_data.hub import push_to_hub

    url = push_to_hub(folder, repo_id, private=private, license=license)
    print(f"treg-push: uploaded {folder} to {url}")


def main() -> None:
    run_cli(app, "treg-push")


if __name__ == "__main__":
    main()
