# One image, every role: the compose services differ only by command.
FROM python:3.11-slim
WORKDIR /app
# CPU build of torch first: an unpinned torch would pull gigabytes of CUDA packages.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md cli.py ./
COPY broker broker
COPY workers workers
COPY pipeline pipeline
RUN pip install --no-cache-dir . flower
RUN useradd --create-home lmteam
USER lmteam
ENTRYPOINT ["lmteam"]
