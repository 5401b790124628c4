"""The release stage: signed, reproducible per-router bundles that routers fetch and verify.

bundle (pack, build, sign, verify) -> signify (the usign/signify file format) -> keys (the signing
pair) -> policy (tags, serials, refusals) -> git (revisions, tags) -> cli (the release verbs) ->
server (GitHub's download layout, for the lab and the tests).
"""
