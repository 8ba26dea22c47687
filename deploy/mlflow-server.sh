#!/usr/bin/env bash
# An MLflow tracking server for a cluster, safe by default (`make mlflow-server` runs this):
#   - basic-auth (`--app-name basic-auth`): every request needs a user; anonymous users get no permission;
#   - the admin's password is generated once and kept in $MLFLOW_SERVER_HOME/admin-password (0600), and
#     reaches MLflow through its environment, never the command line (which `ps` shows every user);
#   - the backend store URI (which may hold a database password) likewise: $MLFLOW_BACKEND_STORE_URI, or
#     the file $MLFLOW_BACKEND_STORE_URI_FILE, else a sqlite file in $MLFLOW_SERVER_HOME;
#   - `--allowed-hosts`: requests for any other Host are refused (DNS rebinding);
#   - no job runner: MLflow 3 otherwise starts a huey job runner (eight more Python processes) for its GenAI
#     jobs, which training runs never use; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true brings it back.
# Put TLS in front of it (a reverse proxy that terminates HTTPS) before it leaves a private network.
#
# Settings (environment): MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000), MLFLOW_ALLOWED_HOSTS
# (localhost:*,127.0.0.1:*), MLFLOW_ARTIFACTS (a folder or s3://...), MLFLOW_SERVER_HOME
# ($OPENCLAW_HOME/mlflow-server, i.e. ~/openclaw/mlflow-server), PYTHON (python3: one with `mlflow[auth]`,
# as `make mlflow-server` installs). Clients: MLFLOW_TRACKING_USERNAME=admin and
# MLFLOW_TRACKING_PASSWORD="$(cat $MLFLOW_SERVER_HOME/admin-password)" (or a user the admin created).
set -euo pipefail
umask 077
SERVER_HOME="${MLFLOW_SERVER_HOME:-${OPENCLAW_HOME:-$HOME/openclaw}/mlflow-server}"
mkdir -p "$SERVER_HOME"
chmod 700 "$SERVER_HOME"
# Its default is inside ~/openclaw, which may be the project folder that `ray job submit --working-dir .`
# uploads and a cluster's nodes copy: git and Ray leave out whatever a .gitignore ignores.
[ -e "$SERVER_HOME/.gitignore" ] || echo '*' > "$SERVER_HOME/.gitignore"
PY="${PYTHON:-python3}"

secret_file() {  # a random secret, made once, readable by its owner only
  if [ ! -s "$1" ]; then "$PY" -c 'import secrets; print(secrets.token_urlsafe(32))' > "$1"; fi
  chmod 600 "$1"
  cat "$1"
}

if [ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]; then
  if [ -n "${MLFLOW_BACKEND_STORE_URI_FILE:-}" ]; then
    MLFLOW_BACKEND_STORE_URI="$(cat "$MLFLOW_BACKEND_STORE_URI_FILE")"
  else
    MLFLOW_BACKEND_STORE_URI="sqlite:///$SERVER_HOME/mlflow.db"
  fi
fi
cat > "$SERVER_HOME/basic_auth.ini" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///$SERVER_HOME/basic_auth.db
admin_username = admin
INI
export MLFLOW_BACKEND_STORE_URI
export MLFLOW_AUTH_CONFIG_PATH="$SERVER_HOME/basic_auth.ini"
export MLFLOW_AUTH_ADMIN_USERNAME=admin
export MLFLOW_AUTH_ADMIN_PASSWORD="$(secret_file "$SERVER_HOME/admin-password")"
export MLFLOW_FLASK_SERVER_SECRET_KEY="$(secret_file "$SERVER_HOME/flask-secret-key")"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
echo "mlflow-server: basic-auth on http://${MLFLOW_HOST:-127.0.0.1}:${MLFLOW_PORT:-5000}; user admin, password in $SERVER_HOME/admin-password (0600)" >&2
exec "$PY" -m mlflow server --app-name basic-auth \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-localhost:*,127.0.0.1:*}" \
  --artifacts-destination "${MLFLOW_ARTIFACTS:-$SERVER_HOME/artifacts}" --workers 1
