"""The floor of vitcost's own stack: a minimal Typer program that validates one pydantic
model from a YAML string and prints one rich table. `vitcost plan` is timed against it."""

import typer
import yaml
from pydantic import BaseModel, ConfigDict
from rich.console import Console
from rich.table import Table

PROFILE = """
memory_mib: 81920
memory_bandwidth_gb_per_s: 2039
dense_tflops_bf16: 312
"""


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    memory_mib: int
    memory_bandwidth_gb_per_s: float
    dense_tflops_bf16: float


app = typer.Typer(add_completion=False)


@app.command()
def main(name: str = "a100") -> None:
    profile = Profile(**yaml.safe_load(PROFILE))
    table = Table(title=name)
    for key in type(profile).model_fields:
        table.add_column(key)
    table.add_row(*(str(v) for v in profile.model_dump().values()))
    Console().print(table)


if __name__ == "__main__":
    app()
