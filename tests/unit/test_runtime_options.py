"""The head's and the node agent's command lines (session.parse_options): read directly when
well formed, by argparse otherwise, and always what argparse itself makes of them."""

import pytest

from farpool._private import head, node_main, session

WELL_FORMED = [
    (node_main.OPTIONS, ["--session-dir", "/tmp/s", "--head-address", "ipc:///tmp/s/head", "--node-id", "ab12",
                         "--resources", '{"gpu": 1}', "--embedded", "--head-node", "--lifeline", "--num-cpus", "2"]),
    (node_main.OPTIONS, ["--session-dir=/tmp/s", "--head-address", "10.0.0.1:6380", "--node-id", "x", "--port",
                         "-1", "--object-store-memory", "1e9", "--num-gpus=0.5", "--resources", ""]),
    (node_main.OPTIONS, ["--node-id", "a", "--session-dir", "/a", "--head-address", "h", "--node-id", "b"]),
    (head.OPTIONS, ["--session-dir", "/tmp/s", "--embedded", "--lifeline"]),
    (head.OPTIONS, ["--session-dir", "/s", "--host", "0.0.0.0", "--port", "6380", "--advertise-host", "10.1.2.3",
                    "--dashboard-port", "8265", "--no-dashboard", "--db", "/s/h.db", "--restore"]),
]


@pytest.mark.parametrize("options,argv", WELL_FORMED)
def test_well_formed_command_lines_read_as_argparse_reads_them(options, argv):
    expected = vars(session.argument_parser("p", options).parse_args(argv))
    got = vars(session.parse_options("p", options, argv))
    assert got == expected
    assert all(type(got[k]) is type(expected[k]) for k in expected)


MALFORMED = [
    ["--session-dir"],                                   # no value
    ["--session-dir", "/s", "--head-address", "h"],      # --node-id missing
    ["--session-dir", "/s", "--head-address", "h", "--node-id", "n", "--port", "many"],
    ["--session-dir", "/s", "--head-address", "h", "--node-id", "n", "--colour", "red"],
    ["--session-dir", "/s", "--head-address", "h", "--node-id", "n", "--embedded=yes"],
    ["--session-dir", "--head-address", "h", "--node-id", "n"],
    ["stray", "--session-dir", "/s", "--head-address", "h", "--node-id", "n"],
]


@pytest.mark.parametrize("argv", MALFORMED)
def test_anything_else_is_argparse_s_answer(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        session.parse_options("farpool-node", node_main.OPTIONS, argv)
    assert exc.value.code == 2
    assert "usage: farpool-node" in capsys.readouterr().err


def test_abbreviations_and_help_go_to_argparse(capsys):
    args = session.parse_options("farpool-head", head.OPTIONS, ["--session", "/s", "--emb"])
    assert args.session_dir == "/s" and args.embedded is True and args.port == 0
    with pytest.raises(SystemExit) as exc:
        session.parse_options("farpool-head", head.OPTIONS, ["--help"])
    assert exc.value.code == 0
    assert "--dashboard-port" in capsys.readouterr().out


def test_a_well_formed_command_line_does_not_import_argparse():
    """What the fast path is for: no argparse (nor gettext) in a head or agent that starts well."""
    import subprocess
    import sys
    code = ("import sys\n"
            "from farpool._private import head, node_main, session\n"
            "assert 'argparse' not in sys.modules, 'imported by the modules themselves'\n"
            f"session.parse_options('p', node_main.OPTIONS, {WELL_FORMED[0][1]!r})\n"
            f"session.parse_options('p', head.OPTIONS, {WELL_FORMED[3][1]!r})\n"
            "print(sorted(m for m in ('argparse', 'gettext') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
