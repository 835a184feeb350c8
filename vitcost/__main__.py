from vitcost.cli import app

app(prog_name="vitcost")
