#!/bin/sh
# The image's entrypoint: run one of the toolkit's three CLIs (flowprep, strnet, pipelines).
set -eu
case "${1:-}" in
    flowprep|strnet|pipelines) exec "$@" ;;
    ""|-h|--help)
        echo "usage: docker run [--gpus all] -v DATA:/data IMAGE {flowprep|strnet|pipelines} ARGS..."
        exit 0 ;;
    *)
        echo "error: unknown command '$1': expected flowprep, strnet or pipelines" >&2
        exit 2 ;;
esac
