// The dashboard's only script: the live log over server-sent events, and the board's
// refresh. Every page reads fine without it.
(function () {
  "use strict";
  var log = document.getElementById("live-log");
  if (log && window.EventSource) {
    var source = new EventSource(log.getAttribute("data-stream"));
    source.addEventListener("log", function (e) {
      var atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      // textContent: the log is text from an agent, never markup.
      log.appendChild(document.createTextNode(e.data + "\n"));
      if (atBottom) { log.scrollTop = log.scrollHeight; }
    });
    source.addEventListener("end", function (e) {
      source.close();
      var note = document.createElement("div");
      note.className = "muted";
      note.textContent = "— " + e.data + " —";
      log.appendChild(note);
    });
  }
  // The board and the machine room re-read themselves every few seconds, in place, unless
  // the operator is typing in a filter.
  var board = document.getElementById("board");
  if (board) {
    var seconds = parseInt(board.getAttribute("data-refresh"), 10) || 5;
    setInterval(function () {
      var active = document.activeElement;
      if (active && (active.tagName === "INPUT" || active.tagName === "SELECT")) { return; }
      fetch(window.location.href, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (text) {
          if (!text) { return; }
          var doc = new DOMParser().parseFromString(text, "text/html");
          var fresh = doc.getElementById("board");
          var current = document.getElementById("board");
          if (fresh && current) { current.replaceWith(fresh); }
        })
        .catch(function () {});
    }, seconds * 1000);
  }
})();
