# Test hook (tests/test_review_again.py): with AIPM_CRASH_AFTER_REWORK set, an owner dies (os._exit, as a SIGKILL
# would leave it) right after a rejected review's first write (REWORK), before its second (QUEUED or REJECTED).
import os

if os.environ.get("AIPM_CRASH_AFTER_REWORK"):
    import aipm.reviewing as _reviewing

    _after_review = _reviewing.after_review

    def after_review(*args, **kwargs):
        updates = _after_review(*args, **kwargs)
        yield updates[0]
        if len(updates) > 1:
            os._exit(9)
        yield from updates[1:]

    _reviewing.after_review = after_review
