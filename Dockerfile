# syntax=docker/dockerfile:1
# Build stage: the package and all its dependencies as wheels (build tools stay here), at the
# versions pinned in constraints.txt.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
# Every dependency at the version pinned in constraints.txt: the same image from the same commit.
RUN pip wheel --no-cache-dir --wheel-dir /wheels --constraint constraints.txt .

# Final stage: the installed wheels only, run as an unprivileged user.
FROM python:3.11-slim
RUN useradd --create-home --uid 10001 app
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /home/app
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["dokstamp-sync"]
CMD ["--help"]
