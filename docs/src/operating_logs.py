"""JSON logs that show each record's task, tick, attempt and outcome (docs/operating.md)."""

import json
import logging

STANDARD = set(vars(logging.makeLogRecord({})))  # the attributes every record has


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the fields passed in ``extra`` (as python-json-logger)."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"level": record.levelname, "logger": record.name, "message": record.getMessage()}
        line.update({k: v for k, v in vars(record).items() if k not in STANDARD})
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure_logging() -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.getLogger("repeat_every").addHandler(handler)
