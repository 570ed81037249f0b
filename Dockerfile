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

RUN useradd --create-home layerscope && mkdir -p /data && chown layerscope /data
USER layerscope
VOLUME ["/data"]
EXPOSE 8765

CMD ["layerscope", "serve", "--host", "0.0.0.0", "--port", "8765", "--data-dir", "/data"]
