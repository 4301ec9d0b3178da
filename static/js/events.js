/* Events log: a click anywhere on a row opens its details (the row's time link does the
   HTMX request, so without JavaScript the link opens the details page); Escape or the
   close button empties the panel. No inline scripts (CSP). */
(function () {
  "use strict";

  function panel() { return document.getElementById("event-detail"); }

  function markSelected(row) {
    document.querySelectorAll("table.log tr.selected").forEach(function (r) { r.classList.remove("selected"); });
    if (row) { row.classList.add("selected"); }
  }

  document.addEventListener("click", function (event) {
    var target = event.target;
    if (!(target instanceof Element)) { return; }
    if (target.closest("[data-close-detail]")) {
      var p = panel();
      if (p) { p.innerHTML = ""; markSelected(null); event.preventDefault(); }
      return;
    }
    var row = target.closest("table.log tbody tr");
    if (!row) { return; }
    if (target.closest("a, button, input, select, label")) {
      if (target.closest("a[data-detail-link]")) { markSelected(row); }
      return;
    }
    if (window.getSelection && String(window.getSelection()).length) { return; }  // selecting text
    var link = row.querySelector("a[data-detail-link]");
    if (link) { markSelected(row); link.click(); }
  });

  document.addEventListener("keydown", function (event) {
    var p = panel();
    if (event.key === "Escape" && p && p.innerHTML.trim() !== "") {
      p.innerHTML = "";
      markSelected(null);
    }
  });
})();
