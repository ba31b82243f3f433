"""Reading restic repositories (``cairn copy --from-repo restic:LOCATION``)."""
