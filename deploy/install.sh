#!/usr/bin/env bash
# Install vsm-sidecar on a plain systemd host, or remove it.
#
#   deploy/install.sh [--python PYTHON] [--from WHEEL|SDIST|SOURCE_TREE] [--root DIR]
#   deploy/install.sh --uninstall [--purge] [--root DIR]
#   deploy/install.sh --which-python [--python PYTHON]
#
# Install (run as root; running it again gives the same result, so it is also the upgrade):
#   - a virtualenv in /opt/vsm-sidecar made by PYTHON (default: the first of python3.11,
#     python3.12, python3 on PATH that is 3.11 or newer), holding the sidecar installed by pip
#     from --from (default: the source tree this script belongs to) and its dependencies;
#   - the system user and group vsm-sidecar (no login shell, no home directory created);
#   - /var/lib/vsm-sidecar, the data directory: mode 0700, owned by vsm-sidecar (the unit's
#     StateDirectory=);
#   - /etc/vsm-sidecar/sidecar.toml from deploy/sidecar.example.toml, only if it does not exist
#     (an existing file is never touched);
#   - /etc/systemd/system/vsm-sidecar.service with ExecStart= and ExecStopPost= pointing into
#     the virtualenv, enabled (not started: edit the settings first, then
#     `systemctl start vsm-sidecar`).
# pip reads its usual environment: for a host without PyPI, PIP_NO_INDEX=1 and
# PIP_FIND_LINKS=/path/to/wheelhouse.
#
# --uninstall stops and disables the unit and removes it and the virtualenv; the settings, the
# data directory and the user stay unless --purge is given as well.
#
# --root DIR does all of it under DIR instead of / (a staging or test tree: useradd --root and
# systemctl --root work on it offline). The virtualenv's scripts then name their interpreter
# by its path under DIR, so such a tree is for inspection and tests, not for copying to a host.
set -euo pipefail

# pyproject.toml's requires-python (tests/test_install.py checks that they agree).
MIN_PYTHON=3.11
PYTHON_CANDIDATES=(python3.11 python3.12 python3)

NAME=vsm-sidecar
UNIT=vsm-sidecar.service
VENV=/opt/vsm-sidecar
CONFIG_DIR=/etc/vsm-sidecar
CONFIG=$CONFIG_DIR/sidecar.toml
DATA_DIR=/var/lib/vsm-sidecar
UNIT_DIR=/etc/systemd/system

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source_tree=$(dirname "$here")

usage() {
    sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

say() {
    echo "install.sh: $*"
}

python_is_new_enough() {
    "$1" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$MIN_PYTHON'.split('.'))))" \
        2>/dev/null
}

choose_python() {
    local candidate
    if [ -n "$python" ]; then
        python_is_new_enough "$python" || die "$python is not Python $MIN_PYTHON or newer"
        echo "$python"
        return
    fi
    for candidate in "${PYTHON_CANDIDATES[@]}"; do
        if command -v "$candidate" >/dev/null && python_is_new_enough "$candidate"; then
            command -v "$candidate"
            return
        fi
    done
    die "no Python $MIN_PYTHON or newer among ${PYTHON_CANDIDATES[*]} on PATH; install one" \
        "(docs/OPERATIONS.md names the package per distribution) or pass --python"
}

# The uid and gid of the user, from the passwd database of the target root.
user_ids() {
    if [ -z "$root" ]; then
        getent passwd "$NAME" | cut -d: -f3,4
    elif [ -f "$root/etc/passwd" ]; then
        awk -F: -v name="$NAME" '$1 == name { print $3 ":" $4 }' "$root/etc/passwd"
    fi
}

group_exists() {
    if [ -z "$root" ]; then
        getent group "$NAME" >/dev/null
    else
        [ -f "$root/etc/group" ] && grep -q "^$NAME:" "$root/etc/group"
    fi
}

nologin_shell() {
    local shell
    for shell in /usr/sbin/nologin /sbin/nologin; do
        if [ -x "$root$shell" ]; then
            echo "$shell"
            return
        fi
    done
    echo /usr/sbin/nologin
}

systemd_is_running() {
    [ -z "$root" ] && [ -d /run/systemd/system ]
}

make_venv() {
    local chosen=$1 want have=""
    want=$("$chosen" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [ -x "$root$VENV/bin/python" ]; then
        have=$("$root$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' \
               2>/dev/null) || have=""
    fi
    if [ "$have" = "$want" ]; then
        say "virtualenv $root$VENV (Python $have) is there"
        return
    fi
    if [ -e "$root$VENV" ]; then
        say "virtualenv $root$VENV is for Python ${have:-(broken)}, not $want: making it anew"
        rm -rf -- "$root$VENV"
    fi
    "$chosen" -c 'import ensurepip, venv' 2>/dev/null ||
        die "$chosen lacks the venv module or ensurepip (Debian and Ubuntu: install" \
            "python$want-venv)"
    mkdir -p -- "$(dirname "$root$VENV")"
    "$chosen" -m venv "$root$VENV"
    say "virtualenv $root$VENV made by $chosen (Python $want)"
}

install_package() {
    local from=$1
    [ -e "$from" ] || die "--from $from: no such file or directory"
    from=$(cd "$(dirname "$from")" && pwd)/$(basename "$from")
    "$root$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
        --upgrade "$from"
    say "installed: $("$root$VENV/bin/vsm-sidecar" --version)"
}

make_user() {
    local args=()
    [ -n "$root" ] && args=(--root "$root")
    if [ -n "$(user_ids)" ]; then
        say "user $NAME is there"
        return
    fi
    # -U makes the group of the same name; with an existing group, useradd wants -g instead.
    if group_exists; then
        args+=(--gid "$NAME")
    else
        args+=(--user-group)
    fi
    useradd "${args[@]}" --system --no-create-home --home-dir "$DATA_DIR" \
        --shell "$(nologin_shell)" --comment "vsm-sidecar (ThinLinc VSM high availability)" \
        "$NAME"
    say "user $NAME made"
}

make_data_dir() {
    local ids=$1
    mkdir -p -- "$root$DATA_DIR"
    chown -- "$ids" "$root$DATA_DIR"
    chmod 0700 -- "$root$DATA_DIR"
}

install_config() {
    local ids=$1
    mkdir -p -- "$root$CONFIG_DIR"
    chown -- "0:${ids#*:}" "$root$CONFIG_DIR"
    chmod 0750 -- "$root$CONFIG_DIR"
    if [ -e "$root$CONFIG" ]; then
        say "$root$CONFIG is there: left as it is"
        return
    fi
    install -m 0640 -o 0 -g "${ids#*:}" -- "$here/sidecar.example.toml" "$root$CONFIG"
    say "$root$CONFIG written from deploy/sidecar.example.toml: edit it before starting"
}

install_unit() {
    local target=$root$UNIT_DIR/$UNIT staged
    mkdir -p -- "$root$UNIT_DIR"
    staged=$(mktemp)
    # Only the program changes: its arguments stay as the unit file has them.
    sed -e "s|^ExecStart=[^ ]*|ExecStart=$VENV/bin/vsm-sidecar|" \
        -e "s|^ExecStopPost=[^ ]*|ExecStopPost=$VENV/bin/vsm-sidecar|" \
        "$here/systemd/$UNIT" >"$staged"
    if [ -f "$target" ] && cmp -s "$staged" "$target"; then
        rm -f -- "$staged"
    else
        install -m 0644 -o 0 -g 0 -- "$staged" "$target"
        rm -f -- "$staged"
        say "$target installed"
    fi
    if ! command -v systemctl >/dev/null; then
        say "no systemctl here: $UNIT installed but not enabled"
        return
    fi
    if systemd_is_running; then
        systemctl daemon-reload
    fi
    systemctl "${systemctl_root[@]}" --quiet enable "$UNIT"
    say "$UNIT enabled (start it with: systemctl start $UNIT)"
}

do_install() {
    local chosen ids
    [ -n "$from" ] || from=$source_tree
    chosen=$(choose_python)
    make_venv "$chosen"
    install_package "$from"
    make_user
    ids=$(user_ids)
    [ -n "$ids" ] || die "user $NAME was made but cannot be found"
    make_data_dir "$ids"
    install_config "$ids"
    install_unit
    say "done; check the settings with:" \
        "$VENV/bin/vsm-sidecar check-config --config $CONFIG"
}

do_uninstall() {
    local target=$root$UNIT_DIR/$UNIT args=()
    if [ -e "$target" ] && command -v systemctl >/dev/null; then
        if systemd_is_running; then
            systemctl --quiet disable --now "$UNIT"
        else
            systemctl "${systemctl_root[@]}" --quiet disable "$UNIT"
        fi
    fi
    rm -f -- "$target"
    if systemd_is_running; then systemctl daemon-reload; fi
    rm -rf -- "$root$VENV"
    say "unit and virtualenv removed"
    if [ "$purge" != yes ]; then
        say "kept: $root$CONFIG_DIR, $root$DATA_DIR and the user $NAME (--purge removes them)"
        return
    fi
    rm -rf -- "$root$UNIT_DIR/$UNIT.d" "$root$CONFIG_DIR" "$root$DATA_DIR"
    [ -n "$root" ] && args=(--root "$root")
    if [ -n "$(user_ids)" ]; then
        userdel "${args[@]}" "$NAME"
    fi
    # userdel removes the user's own group only where login.defs says USERGROUPS_ENAB yes.
    if group_exists; then
        groupdel "${args[@]}" "$NAME"
    fi
    say "purged: settings, data directory, user and group"
}

python=""
from=""
root=""
action=install
purge=no
while [ $# -gt 0 ]; do
    case "$1" in
        --python) [ $# -ge 2 ] || usage; python=$2; shift 2 ;;
        --from) [ $# -ge 2 ] || usage; from=$2; shift 2 ;;
        --root) [ $# -ge 2 ] || usage; root=$2; shift 2 ;;
        --uninstall) action=uninstall; shift ;;
        --purge) action=uninstall; purge=yes; shift ;;
        --which-python) action=which-python; shift ;;
        -h|--help) usage ;;
        *) echo "install.sh: unknown argument $1" >&2; usage ;;
    esac
done

if [ -n "$root" ]; then
    [ -d "$root" ] || die "--root $root: no such directory"
    root=$(cd "$root" && pwd)
    [ "$root" = / ] && root=""
fi
systemctl_root=()
[ -n "$root" ] && systemctl_root=(--root="$root")

case "$action" in
    which-python) choose_python ;;
    install)
        [ "$(id -u)" = 0 ] || die "run it as root"
        do_install ;;
    uninstall)
        [ "$(id -u)" = 0 ] || die "run it as root"
        do_uninstall ;;
esac
