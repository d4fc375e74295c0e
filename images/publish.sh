#!/usr/bin/env bash
# Release rules of the images (.github/workflows/images.yml runs it; docs/images.md "Publish"):
#
#   images/publish.sh version          the image version of this ref: the full commit SHA on a branch
#                                      (GITHUB_SHA), the version X.Y.Z on a git tag vX.Y.Z, which must
#                                      be the chart's appVersion (its defaults then name the images)
#   images/publish.sh stage TARGET...  copy the built images (podman's storage) to the staging
#                                      repository: WRPO_STAGING:<version>-<target>
#   images/publish.sh promote          copy every staged image to its name (images/build.sh --list),
#                                      after checking that all are staged and that no name exists yet:
#                                      a tag is never overwritten (a SHA tag that holds the very same
#                                      image is left as it is, so a re-run can finish a publish)
#
# Settings (environment): WRPO_IMAGE_REGISTRY and WRPO_IMAGE_VERSION as for images/build.sh,
# WRPO_STAGING (e.g. ghcr.io/<owner>/wrpo-staging), WRPO_TRANSPORT (skopeo's transport of both:
# docker:// by default; the tests use oci: layouts). Needs skopeo (and podman for `stage`).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "${HERE}")"
TRANSPORT="${WRPO_TRANSPORT:-docker://}"

log() { printf '[publish] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

app_version() {
  sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$/\1/p' "${ROOT}/charts/wrpo-operator/Chart.yaml"
}

version() {
  local app
  app="$(app_version)"
  if [[ "${GITHUB_REF_TYPE:-branch}" == tag ]]; then
    [[ "${GITHUB_REF_NAME:-}" =~ ^v([0-9][0-9A-Za-z.+-]*)$ ]] || die "tag '${GITHUB_REF_NAME:-}' is not v<version>"
    [[ "${BASH_REMATCH[1]}" == "${app}" ]] \
      || die "tag ${GITHUB_REF_NAME} is not the chart's appVersion ${app}: bump charts/wrpo-operator/Chart.yaml first"
    echo "${app}"
  else
    [[ "${GITHUB_SHA:-}" =~ ^[0-9a-f]{40}$ ]] || die "GITHUB_SHA '${GITHUB_SHA:-}' is not a commit SHA"
    echo "${GITHUB_SHA}"
  fi
}

# target -> name, as images/build.sh names them for WRPO_IMAGE_VERSION.
declare -A NAME=()
names() {
  [[ -n "${WRPO_IMAGE_VERSION:-}" ]] || die "WRPO_IMAGE_VERSION is not set (images/publish.sh version)"
  local target name
  while read -r target name; do NAME[${target}]="${name}"; done < <(bash "${HERE}/build.sh" --list)
}
staged() { echo "${WRPO_STAGING:?WRPO_STAGING is not set}:${WRPO_IMAGE_VERSION}-$1"; }
digest() { skopeo inspect --format '{{.Digest}}' "${TRANSPORT}$1" 2>/dev/null; }

stage() {
  names
  local t
  for t in "$@"; do
    [[ -n "${NAME[${t}]:-}" ]] || die "unknown target '${t}'"
    log "staging ${t}: ${NAME[${t}]} -> $(staged "${t}")"
    podman push --quiet "${NAME[${t}]}" "${TRANSPORT}$(staged "${t}")"
  done
}

promote() {
  names
  local t src dst want have release=0 todo=()
  [[ "${WRPO_IMAGE_VERSION}" =~ ^[0-9a-f]{40}$ ]] || release=1
  # Every check first: nothing is copied unless every image can be.
  for t in "${!NAME[@]}"; do
    src="$(staged "${t}")" dst="${NAME[${t}]}"
    want="$(digest "${src}")" || die "${t}: ${src} is not staged (did every build and smoke test pass?)"
    if have="$(digest "${dst}")"; then
      if [[ "${release}" == 1 ]]; then
        die "${dst} exists: a release tag is never overwritten"
      elif [[ "${have}" != "${want}" ]]; then
        die "${dst} exists and holds another image (${have}, staged ${want})"
      fi
      log "${t}: ${dst} already holds ${want}"
    else
      todo+=("${t}")
    fi
  done
  for t in "${todo[@]}"; do
    log "publishing ${t}: ${NAME[${t}]}"
    skopeo copy --quiet --all --preserve-digests "${TRANSPORT}$(staged "${t}")" "${TRANSPORT}${NAME[${t}]}"
  done
  log "published ${#todo[@]} of ${#NAME[@]} images as version ${WRPO_IMAGE_VERSION}"
}

case "${1:-}" in
  version) version ;;
  stage) shift; stage "$@" ;;
  promote) promote ;;
  *) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
esac
