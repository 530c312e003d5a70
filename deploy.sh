#!/usr/bin/env bash
# The seed's quick-start verbs, kept as thin names for the real tools (no logic of its own):
#
#   ./deploy.sh docker up|down|logs    docker compose -f conf/compose.yaml …
#   ./deploy.sh k8s up|status|down     kubectl apply -k / get / delete -k conf/k8s
#   ./deploy.sh local start|stop       mcp-appliance run in the background / stop it
#
# Extra arguments go to the underlying tool. `local` uses $MCP_APPLIANCE_CONFIG (default
# /etc/mcp-appliance/appliance.toml) and keeps its pid and output in $MCP_DEPLOY_LOCAL_DIR
# (default ./.mcp-appliance-local; not MCP_APPLIANCE_*: the appliance rejects unknown names there).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
local_dir=${MCP_DEPLOY_LOCAL_DIR:-$here/.mcp-appliance-local}

usage() {
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

need() {
    command -v "$1" >/dev/null 2>&1 || {
        echo "deploy.sh: '$1' not found on PATH: $2" >&2
        exit 127
    }
}

running() {  # pid $1 exists and is not a zombie
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat%% *}" != Z ]
}

[ $# -ge 2 ] || usage
target=$1 verb=$2
shift 2

case "$target $verb" in
    "docker up")
        need docker "install Docker Engine with the compose plugin"
        exec docker compose -f "$here/conf/compose.yaml" up -d --build "$@" ;;
    "docker down")
        need docker "install Docker Engine with the compose plugin"
        exec docker compose -f "$here/conf/compose.yaml" down "$@" ;;
    "docker logs")
        need docker "install Docker Engine with the compose plugin"
        exec docker compose -f "$here/conf/compose.yaml" logs -f "$@" ;;
    "k8s up")
        need kubectl "install kubectl (it includes kustomize) and point it at your cluster"
        exec kubectl apply -k "$here/conf/k8s" "$@" ;;
    "k8s status")
        need kubectl "install kubectl (it includes kustomize) and point it at your cluster"
        exec kubectl get statefulset,pods,services,hpa,pdb,pvc \
            -l app.kubernetes.io/name=mcp-appliance "$@" ;;
    "k8s down")
        need kubectl "install kubectl (it includes kustomize) and point it at your cluster"
        exec kubectl delete -k "$here/conf/k8s" "$@" ;;
    "local start")
        need mcp-appliance "install the package (pip install .) or activate its virtualenv"
        mkdir -p "$local_dir"
        nohup mcp-appliance "$@" run >>"$local_dir/appliance.out" 2>&1 &
        echo $! >"$local_dir/appliance.pid"
        echo "started mcp-appliance (pid $!); output: $local_dir/appliance.out" ;;
    "local stop")
        [ -f "$local_dir/appliance.pid" ] || {
            echo "deploy.sh: no $local_dir/appliance.pid: not started with './deploy.sh local start'" >&2
            exit 1
        }
        pid=$(cat "$local_dir/appliance.pid")
        # SIGTERM: supervisord stops nginx, the admin app and the workers gracefully (within
        # workers.graceful_timeout); wait for it, so the ports are free once this returns.
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 900); do
            running "$pid" || break
            sleep 0.1
        done
        rm -f "$local_dir/appliance.pid"
        if running "$pid"; then
            echo "deploy.sh: mcp-appliance (pid $pid) is still stopping after 90 s" >&2
            exit 1
        fi
        echo "stopped mcp-appliance (pid $pid)" ;;
    *)
        usage ;;
esac
