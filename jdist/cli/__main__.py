from jdist.cli import entry

entry()
