// Runs in <head> before first paint: pick the theme so the page never flashes the wrong one.
(function () {
  "use strict";
  var theme = null;
  try {
    theme = window.localStorage.getItem("ezauth-theme");
  } catch (e) {
    theme = null;
  }
  if (theme !== "dark" && theme !== "light") {
    var dark = window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches;
    theme = dark ? "dark" : "light";
  }
  document.documentElement.setAttribute("data-theme", theme);
})();
