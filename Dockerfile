# layerscope server and built-in trainer, one image.
# Installs the package the same way the README does: torch pinned first, then the project.
FROM python:3.11-slim

WORKDIR /app
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LAYERSCOPE_DATA_DIR=/data

COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY server ./server
COPY web ./web
RUN pip install torch==2.13.0 && pip install .

# /home/layerscope/runs: the compose trainers' volume mounts there; a named volume takes the
# image folder's owner only when the folder exists in the image (else root owns it)
RUN useradd --create-home layerscope && mkdir -p /data /home/layerscope/runs \
    && chown layerscope /data /home/layerscope/runs
USER layerscope
VOLUME ["/data"]
EXPOSE 8765

CMD ["layerscope", "serve", "--host", "0.0.0.0", "--port", "8765", "--data-dir", "/data"]
