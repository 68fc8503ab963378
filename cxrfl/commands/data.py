"""`cxrfl data ...`: create, import, split and check data sets."""

from cxrfl.commands import data_check, data_import, data_split, data_synth


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="create, import, split and check data sets",
        description="Create the synthetic default, import real data sets into manifests, "
        "partition them into sites, and check them for bad files.",
    )
    sub = parser.add_subparsers(dest="data_command", metavar="{synth,import,split,check}", required=True)
    data_synth.add_parser(sub)
    data_import.add_parser(sub)
    data_split.add_parser(sub)
    data_check.add_parser(sub)
