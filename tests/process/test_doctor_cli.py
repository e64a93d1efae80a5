"""`python ezauth.py doctor` as a subprocess without nginx: its usage errors, a site nothing answers,
and the README's daily systemd units, which systemd-analyze must accept."""

from __future__ import annotations

import re
import shlex

import pytest

import ezauth
from tests.support.basics import free_port
from tests.support.process import findings, readme_units, run_cli, run_doctor, verify_units


@pytest.mark.parametrize("args", [
    ["ftp://example.com/"], ["http://"], ["https://user:pw@example.com/"], ["http://example.com:99999/"],
    ["http://127.0.0.1/ezauth/login"], ["http://example.com/ a"], [],
    ["http://example.com/", "--ca", "cert.pem", "--insecure"],
    ["http://example.com/", "--ca", "/nonexistent/cert.pem"],
    ["http://example.com/", "--http-port", "0"], ["http://example.com/", "--timeout", "0"],
    ["http://example.com/", "--nginx-dump", "-", "--user", "alice"],
    ["http://example.com/", "--user", "alice"],  # and no password on standard input
])
def test_usage_errors_exit_2_and_check_nothing(args):
    done = run_cli("doctor", *args, stdin="")
    assert done.returncode == 2 and done.stdout == "" and done.stderr.strip(), done


def test_nothing_listening_is_one_fail():
    url = f"http://127.0.0.1:{free_port()}/"
    done = run_doctor(url)
    assert findings(done) == ["OK    plain http to 127.0.0.1: a local address (127.0.0.1)",
                           f"FAIL  cannot reach {url}: [Errno 111] Connection refused"]



def test_the_readme_runs_the_doctor_daily_with_units_systemd_accepts(tmp_path):
    units = readme_units("Check your setup: doctor")
    assert sorted(units) == ["ezauth-doctor.service", "ezauth-doctor.timer"]
    service = units["ezauth-doctor.service"]
    dump = re.search(r"^ExecStartPre=\+/bin/sh -c 'exec /usr/sbin/nginx -T > (\S+)'$", service, re.M)
    command = shlex.split(re.search(r"^ExecStart=(.*)$", service, re.M)[1])
    assert dump and command[:3] == ["/opt/ezauth/.venv/bin/python", "/opt/ezauth/ezauth.py", "doctor"]
    args = ezauth.build_parser().parse_args(command[2:])  # the command line as the README writes it
    assert (args.command, args.nginx_dump) == ("doctor", dump[1])
    done = verify_units(units, tmp_path)
    assert done.returncode == 0 and "ezauth-doctor" not in done.stderr, done.stderr
