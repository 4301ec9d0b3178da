/* Live countdowns to a budget's reset ("2 days 4 hours 13 minutes").
   The server renders the same text; this only keeps it current. Charts are drawn by
   app.js from the json_script figures, so there is no inline script anywhere. */
(function () {
  "use strict";

  function plural(n, unit) { return n + " " + unit + (n === 1 ? "" : "s"); }

  function render(el) {
    var target = parseInt(el.getAttribute("data-countdown-to"), 10);
    if (!target) { return; }
    var seconds = Math.max(0, Math.floor(target - Date.now() / 1000));
    var days = Math.floor(seconds / 86400);
    var hours = Math.floor((seconds % 86400) / 3600);
    var minutes = Math.floor((seconds % 3600) / 60);
    el.textContent = plural(days, "day") + " " + plural(hours, "hour") + " " + plural(minutes, "minute");
    el.setAttribute("data-live", "true");
    if (seconds === 0) { el.setAttribute("data-reset-passed", "true"); }
  }

  function tick() {
    document.querySelectorAll("[data-countdown-to]").forEach(render);
  }

  document.addEventListener("DOMContentLoaded", function () {
    tick();
    setInterval(tick, 15000);
  });
  document.addEventListener("htmx:afterSettle", tick);
})();
