/* Draws server-built Plotly figures and wires small filter-bar behaviours.
   No inline scripts: figures arrive as <script type="application/json"> (json_script). */
(function () {
  "use strict";
  var dark = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)");

  function themed(layout) {
    var isDark = dark && dark.matches;
    var text = isDark ? "#e6e8eb" : "#1b1f24";
    var grid = isDark ? "#2a313a" : "#e5e8ec";
    var out = Object.assign({}, layout, {
      paper_bgcolor: "rgba(0,0,0,0)",
      plot_bgcolor: "rgba(0,0,0,0)",
      font: { color: text, family: "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", size: 12 },
      autosize: true
    });
    ["xaxis", "yaxis"].forEach(function (axis) {
      out[axis] = Object.assign({ gridcolor: grid, zerolinecolor: grid, linecolor: grid }, layout[axis] || {});
    });
    out.hoverlabel = { bgcolor: isDark ? "#171b21" : "#ffffff", font: { color: text } };
    return out;
  }

  function draw(root) {
    if (!window.Plotly) { return; }
    (root || document).querySelectorAll(".chart[data-chart]").forEach(function (el) {
      var source = el.querySelector('script[type="application/json"]');
      var plot = el.querySelector(".plot");
      if (!source || !plot) { return; }
      var figure = JSON.parse(source.textContent);
      window.Plotly.react(plot, figure.data, themed(figure.layout || {}), {
        responsive: true, displaylogo: false,
        modeBarButtonsToRemove: ["lasso2d", "select2d", "autoScale2d"]
      });
      el.setAttribute("data-drawn", "true");
    });
  }

  function whenPlotly(callback) {
    if (window.Plotly) { callback(); return; }
    var tries = 0;
    var timer = setInterval(function () {
      tries += 1;
      if (window.Plotly || tries > 200) { clearInterval(timer); callback(); }
    }, 25);
  }

  document.addEventListener("DOMContentLoaded", function () { whenPlotly(function () { draw(document); }); });
  document.body && document.body.addEventListener("htmx:afterSettle", function (event) {
    whenPlotly(function () { draw(event.detail.elt && event.detail.elt.parentNode ? event.detail.elt.parentNode : document); });
  });
  document.addEventListener("htmx:afterSettle", function (event) {
    whenPlotly(function () { draw(document); });
  });
  if (dark && dark.addEventListener) {
    dark.addEventListener("change", function () { draw(document); });
  }

  // Typing in a picker's search box must not submit the filter form.
  document.addEventListener("change", function (event) {
    if (event.target.classList && event.target.classList.contains("picker-search")) {
      event.stopPropagation();
    }
  }, true);

  // Editing the custom range switches the period to "Custom range".
  document.addEventListener("input", function (event) {
    if (event.target.hasAttribute && event.target.hasAttribute("data-custom-range")) {
      var select = document.querySelector("select[data-period]");
      if (select) { select.value = "custom"; }
    }
  }, true);

  // Pickers close on Escape and on a click outside them.
  function closePickers(except) {
    document.querySelectorAll("details.picker[open]").forEach(function (el) {
      if (el !== except) { el.open = false; }
    });
  }
  document.addEventListener("click", function (event) {
    closePickers(event.target.closest ? event.target.closest("details.picker") : null);
  });
  document.addEventListener("keydown", function (event) {
    if (event.key === "Escape") { closePickers(null); }
  });

  // Keep shared URLs short: drop empty and default filter values from requests.
  document.addEventListener("htmx:configRequest", function (event) {
    var params = event.detail.parameters;
    if (!params || !event.detail.elt || event.detail.elt.id !== "filters") { return; }
    var defaults = { status: "all", bucket: "auto" };
    Object.keys(params).forEach(function (key) {
      var value = params[key];
      if (value === "" || defaults[key] === value) { delete params[key]; }
    });
  });

  // Close other pickers when one opens.
  document.addEventListener("toggle", function (event) {
    var el = event.target;
    if (el.classList && el.classList.contains("picker") && el.open) {
      document.querySelectorAll("details.picker[open]").forEach(function (other) {
        if (other !== el) { other.open = false; }
      });
    }
  }, true);
})();
