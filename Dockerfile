# syntax=docker/dockerfile:1
# Build stage: turn the package and its dependencies into wheels.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Final stage: only the installed wheels, run as an unprivileged user.
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER app
WORKDIR /home/app
ENTRYPOINT ["dokstamp-sync"]
CMD ["--help"]
